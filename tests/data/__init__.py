"""Tests of pilamim.data: sources, prepare, prepared data set, torch dataset, transforms."""
