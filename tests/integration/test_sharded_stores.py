"""Sharded checkpoints of a 2-rank job on real protocol servers: the sharded contract on S3 (moto and SeaweedFS) and
GCS (fake-gcs-server)."""

from __future__ import annotations

import pytest

from tests.sharded_contract import ShardedCheckpointContract


class TestShardedOnS3(ShardedCheckpointContract):
    """The sharded contract on S3 through moto's server on 127.0.0.1, on both request paths (lean client,
    botocore's)."""

    @pytest.fixture(params=["lean", "botocore"])
    def url(self, request: pytest.FixtureRequest, s3_url: str) -> str:
        if request.param == "botocore":
            request.getfixturevalue("s3_botocore")
        return s3_url


class TestShardedOnSeaweedFS(ShardedCheckpointContract):
    """The sharded contract on SeaweedFS (a real S3 implementation), through podtrain's own signing client
    (botocore's path runs the storage contract there; here it would add ~30 s)."""

    @pytest.fixture
    def url(self, seaweedfs_url: str) -> str:
        return seaweedfs_url


class TestShardedOnGCS(ShardedCheckpointContract):
    """The sharded contract on GCS through fake-gcs-server on 127.0.0.1."""

    @pytest.fixture
    def url(self, gcs_url: str) -> str:
        return gcs_url
