"""Launchers for real servers used by the tests (SeaweedFS S3, ...), never mocks."""
