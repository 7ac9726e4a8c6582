"""What a command line said: shared by the commands of the application and the experiments, so
that none imports another for it."""

import argparse
from typing import Optional


def given_on_command_line(args: Optional[argparse.Namespace], name: str) -> bool:
    """Whether the command line set ``name`` (``section.field``) as a dotted override."""
    return any(o.split("=", 1)[0].strip() == name for o in getattr(args, "overrides", None) or [])
