"""The mmseg-mask2former adapter without mmcv: the module imports, the adapter is listed as unavailable with
how to install it, and using it raises a clear OptinError. Runs everywhere (mmcv's import is blocked)."""
import subprocess
import sys

import pytest

from optin import registry
from optin.errors import OptinError
from optin_plugins.adapters import mmseg_mask2former as mm
from optin_plugins.adapters.mmseg_mask2former import MMSegMask2FormerAdapter


@pytest.fixture
def no_mmcv(monkeypatch):
    """``import mmcv.ops`` fails (None in sys.modules halts an import), as where mmcv is not installed."""
    for name in ("mmcv", "mmcv.ops", "mmseg", "mmdet"):
        monkeypatch.setitem(sys.modules, name, None)
    mm._import_error.cache_clear()
    yield
    mm._import_error.cache_clear()


def test_unavailable_with_the_reason(no_mmcv):
    reason = MMSegMask2FormerAdapter.unavailable_reason()
    assert reason and "mmcv" in reason and "pip install" in reason and "docs/plugins.md" in reason
    info = {(p.kind, p.name): p for p in registry.plugins("adapter")}[("adapter", "mmseg-mask2former")]
    assert not info.available and "mmcv" in info.error
    with pytest.raises(OptinError, match="unavailable here: needs mmcv"):
        registry.get("adapter", "mmseg-mask2former")
    with pytest.raises(OptinError, match="unavailable: needs mmcv"):
        MMSegMask2FormerAdapter.from_config()
    assert not MMSegMask2FormerAdapter.handles(__import__("torch").nn.Linear(2, 2))


def test_module_imports_without_mm_packages():
    code = ("import sys\n"
            "for n in ('mmcv', 'mmcv.ops', 'mmseg', 'mmdet', 'mmengine'): sys.modules[n] = None\n"
            "from optin_plugins.adapters.mmseg_mask2former import MMSegMask2FormerAdapter as A\n"
            "print(A.unavailable_reason())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("needs mmcv with its compiled ops")
