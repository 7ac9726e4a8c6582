"""Experiments above the application: the paper's recipe end to end (``paper``) and its three
claims measured over seeds (``study``), with their reports. They import the application (app/);
the application never imports them (tests/test_imports.py).

    python -m experiments paper [--config PRESET] [overrides]     (make paper)
    python -m experiments study norms|groups|resolution [...]     (make study)
"""
