"""Errors that mean "the input was wrong": the CLI prints them as one line and exits 2."""

from bridge.checkpoints import CheckpointError
from bridge.cli import UsageError
from bridge.devices import DeviceError
from bridge.generate import GenerationError
from sharding import ShardingError

USER_ERRORS = (CheckpointError, DeviceError, GenerationError, ShardingError, UsageError)
