"""The exceptions bnnas raises on purpose; `cli.py` maps them to exit codes in one place."""


def one_line(text: BaseException | str) -> str:
    """The first non-blank line of a message (an exception's, or any text): what a one-line error shows."""
    first = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    return first or (type(text).__name__ if isinstance(text, BaseException) else "")


class NasError(Exception):
    """A problem the user can fix (bad input, missing data, unknown study): exit code 2."""


class ConfigError(NasError):
    """A config or search-space value is wrong; the message names the file and the key path."""

    def __init__(self, file: str, key_path: str, problem: str):
        self.file, self.key_path, self.problem = str(file), key_path, problem
        where = f"{self.file}: {key_path}" if key_path else self.file
        super().__init__(f"{where}: {problem}")


class DataError(NasError):
    """A dataset cannot be loaded (missing files, wrong arrays)."""


class StudyError(NasError):
    """A study cannot be created or resumed as asked."""


class IntegrityError(NasError):
    """An input file failed its integrity check (sha256, signature, not a regular file, unloadable): bad input,
    exit code 2, one line; nothing from it is run."""


class TrialError(Exception):
    """One candidate failed (cannot be built, loss not finite); recorded on the trial, the search goes on."""


class VerificationError(Exception):
    """An output failed its own check (folding not exact, a saved model that does not reproduce,
    a file whose hash changed): exit code 1, one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the running trial is marked failed and the study stays resumable."""
