"""The package's public API: five names, imported on first use."""
import subprocess
import sys


def test_public_api_is_five_names_loaded_lazily():
    code = ("import sys, clipcap; assert 'torch' not in sys.modules; "
            "from clipcap import Captioner, ClipCap, ClipCapConfig, DecodingOptions, load_checkpoint; "
            "from clipcap.captioner import Captioner as C; assert Captioner is C; "
            "from clipcap.decoding import DecodingOptions as D; assert DecodingOptions is D; "
            "assert sorted(clipcap.__all__) == ['Captioner', 'ClipCap', 'ClipCapConfig', 'DecodingOptions', "
            "'load_checkpoint']")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
