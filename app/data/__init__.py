"""Labelled image data that ships offline (Debian and PyPI packages), for demos and tests."""
