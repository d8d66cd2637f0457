"""Serve the captioning web page (usage: python app.py -h)."""
from clipcap.cli import run_app

if __name__ == "__main__":
    run_app()
