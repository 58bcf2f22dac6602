"""The BWSK IR grammar (``bwsk.lark``), shipped as package data."""
from importlib.resources import files


def grammar_text() -> str:
    return files(__name__).joinpath("bwsk.lark").read_text()
