"""Where tasks are stored and run, behind one contract: one process on disk, or Redis with RQ workers."""
