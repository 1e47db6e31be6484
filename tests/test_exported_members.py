"""The package's public surface: complete, sorted, and importable by name."""

from __future__ import annotations

import subprocess
import sys

import crossws_channels
from crossws_channels import drivers, errors
from tests.agent import ROOT, child_env


def test_all_is_sorted_and_every_name_imports() -> None:
    """__all__ is sorted, and each name in it resolves to the object its module holds."""
    names = crossws_channels.__all__
    assert names == sorted(names)
    for name in names:
        assert getattr(crossws_channels, name) is not None


def test_every_exception_and_driver_protocol_is_exported() -> None:
    """Every public exception and driver protocol is part of the surface."""
    exported = set(crossws_channels.__all__)
    assert {name for name in errors.__all__ if name != "STAGES"} <= exported
    protocols = {"Deliver", "Driver", "DriverFactory", "Ready", "SubscribingDriver"}
    protocols |= {name for name in drivers.__all__ if name.startswith("Supports")}
    assert protocols <= exported


def test_importing_the_package_imports_neither_django_nor_the_drivers() -> None:
    """``import crossws_channels`` is cheap: the relay's entry point relies on it."""
    code = (
        "import sys, crossws_channels\n"
        "heavy = [m for m in ('django', 'channels', 'crossws_channels.layer', "
        "'crossws_channels.drivers.multiprocessing.primary') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True
    )
    assert out.stdout.strip() == "[]", out.stderr
