"""whistle: text-only domain adaptation of Whisper (WhisTLE).

The library behind the `whistle` command. Heavy modules (torch, transformers) load on first use,
so `import whistle_pipeline` stays cheap.
"""
__version__ = "0.1.0"
