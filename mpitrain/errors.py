"""The one exception type that means "bad input": reported as a single line, exit code 2."""


class MpitrainError(Exception):
    """Bad input or configuration; the message names the file/key/rank and what was expected.

    ``agreed`` is set when every rank raised the same error at the same point (see Comm.agree): then one
    rank prints and all exit cleanly instead of aborting the MPI job.
    """

    def __init__(self, message, agreed=False):
        super().__init__(message)
        self.agreed = agreed
