"""The planner: exact parameter counts per method, a memory estimate per method, and advice (`tunesmith plan`)."""
