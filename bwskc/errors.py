"""Errors a user can act on. The CLI prints them as one line and exits 2; anything else is an internal error."""


class BwskError(Exception):
    """Bad input or usage: the message names the problem and the place."""


class IRSyntaxError(BwskError):
    """A parse error in IR text, with the position and the offending line for a caret display."""

    def __init__(self, message: str, *, file: str, line: int, column: int, source_line: str):
        self.file, self.line, self.column, self.source_line = file, line, column, source_line
        self.reason = message
        super().__init__(f"{file}:{line}:{column}: {message}")

    def caret_display(self, width: int = 120) -> str:
        """The line and a caret under the column; a longer line is shown as the window around the
        column (hostile or minified text can hold a line of megabytes)."""
        line, column = self.source_line, self.column
        if len(line) > width:
            start = max(0, min(column - 1 - width // 2, len(line) - width))
            head = "..." if start else ""
            tail = "..." if start + width < len(line) else ""
            line = head + line[start:start + width] + tail
            column = column - start + len(head)
        return f"{line}\n{' ' * (column - 1)}^"


class VerifyError(BwskError):
    """The IR is ill-formed: an unbound name, a type mismatch, a wrong arity."""
