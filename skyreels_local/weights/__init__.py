"""Weights tooling: the on-disk layout and its checks, download from the Hub, single-file import."""
