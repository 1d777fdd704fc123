"""Fixtures for the gateway suites: the Kafka-compatible broker the export tests run the gateway against."""

from tests._peers import tansu, tansu_factory

__all__ = ["tansu", "tansu_factory"]
