"""The package's public API: five names, imported on first use."""
import subprocess
import sys


def test_public_api_is_five_names_loaded_lazily():
    done = subprocess.run([sys.executable, "-c", "import sys, clipcap; print('torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "False\n", done.stderr  # a fresh process: nothing loaded yet

    import clipcap
    from clipcap import Captioner, ClipCap, ClipCapConfig, DecodingOptions, load_checkpoint
    from clipcap.captioner import Captioner as C
    from clipcap.checkpoint import load_checkpoint as load
    from clipcap.decoding import DecodingOptions as D
    from clipcap.model import ClipCap as M
    from clipcap.model import ClipCapConfig as Config

    assert (Captioner, ClipCap, ClipCapConfig, DecodingOptions, load_checkpoint) == (C, M, Config, D, load)
    assert sorted(clipcap.__all__) == ["Captioner", "ClipCap", "ClipCapConfig", "DecodingOptions", "load_checkpoint"]
