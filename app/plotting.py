"""The two matplotlib steps every report plot shares: a headless pyplot, and saving a figure."""

from pathlib import Path
from typing import Any, Union

from app.run_folder import RunFolder


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed); imported only when a plot is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Union[str, Path], dpi: int = 120) -> None:
    """Lay out, write (atomically, through the run-folder writer) and close ``fig`` (closing
    frees it: reports draw many figures)."""
    path = Path(path)
    fig.tight_layout()
    try:
        RunFolder(path.parent).write_document(
            path.name, lambda f: fig.savefig(f, dpi=dpi, format=path.suffix.lstrip(".") or "png")
        )
    finally:
        pyplot().close(fig)
