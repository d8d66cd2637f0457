"""The package's public API: four names, imported on first use."""
import subprocess
import sys


def test_public_api_is_four_names_loaded_lazily():
    code = ("import sys, clipcap; assert 'torch' not in sys.modules; "
            "from clipcap import Captioner, ClipCap, ClipCapConfig, load_checkpoint; "
            "from clipcap.captioner import Captioner as C; assert Captioner is C; "
            "assert sorted(clipcap.__all__) == ['Captioner', 'ClipCap', 'ClipCapConfig', 'load_checkpoint']")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
