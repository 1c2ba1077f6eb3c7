"""Pictures in and frames out: upload decoding and sizing, loops, retiming and colour matching."""
