"""Placeholder: being implemented."""

HELP = "(not yet implemented)"


def add_arguments(parser):
    pass


def run(args):
    from dagman.errors import DagmanError

    raise DagmanError("not implemented yet")
