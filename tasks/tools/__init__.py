"""Thin clients for programs used by several stages."""
