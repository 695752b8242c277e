"""Sans-IO codecs of vitals: every byte format lives here.

Nothing in this package may import asyncio, serial or socket (a test checks).
"""
