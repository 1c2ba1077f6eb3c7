"""The model side that `pipeline.py` assembles: samplers, speed-ups and the generator contract."""
