"""The task: its record and rules, how one is run, and the keys that bind requests to tasks."""
