"""The two matplotlib steps every report plot shares: a headless pyplot, and saving a figure."""


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed); imported only when a plot is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path, dpi: int = 120) -> None:
    """Lay out, write and close ``fig`` (closing frees it: reports draw many figures)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
