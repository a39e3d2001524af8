"""swarmgrad's CPython side: the coordinator (Starlette, SQLite, aiortc), the PyTorch trainer and the CLI."""
