"""Per-member secrets: the cluster token lets a process in; the secret a server hands each
member at Join binds the member's id to the process that joined, so one token holder cannot
act as another member (docs/security.md).

Services keep only the SHA-256 of a secret (in memory and in checkpoints) and compare digests
with `hmac.compare_digest`. No gRPC here: the server's pure core checks secrets with this.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

# 128 random bits: not guessable over a network, and 19 bytes on each message that names a member (2-byte tag, length, secret).
MEMBER_SECRET_BYTES = 16


def new_member_secret() -> bytes:
    return secrets.token_bytes(MEMBER_SECRET_BYTES)


def member_secret_digest(secret: bytes) -> bytes:
    """What a service keeps of a member's secret (and writes to its checkpoints)."""
    return hashlib.sha256(secret).digest()


def member_secret_matches(digest: bytes, presented: bytes) -> bool:
    """Whether `presented` is the secret `digest` was made from, in time independent of both."""
    return hmac.compare_digest(hashlib.sha256(presented).digest(), digest)
