"""Who may use which model, and which adapter version serves an A/B alias.

Tenants (tenants.yaml):
    tenants:
      acme:   {keys: [sk-acme-1], adapters: [acme-contracts]}
      globex: {keys: [sk-globex], adapters: [globex-support]}
An adapter listed under no tenant is shared. API keys are compared with hmac.compare_digest against every key
(no early exit), and never stored in logs or error messages.

A/B aliases: weights over variants (adapter names or `base`). A request with a `user` id is routed by
u = sha256(alias \\0 user) / 2^256 in [0, 1) against the cumulative weights (variants in name order), so one user
keeps one variant while the weights stay put; without a user id the draw is random. promote() sends all traffic
to one variant and remembers the previous weights for rollback().
"""

from __future__ import annotations

import hashlib
import hmac
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunesmith.errors import UsageError

OPEN = "*"  # the tenant of every request when no tenants file is given (loopback only)


class TenantsError(UsageError):
    pass


@dataclass
class Tenants:
    keys: list[tuple[bytes, str]] = field(default_factory=list)  # (key, tenant)
    owners: dict[str, str] = field(default_factory=dict)  # adapter/alias name -> owning tenant

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def tenant_for(self, key: str | None) -> str | None:
        """The tenant of an API key, or None. Checks every key in constant time each."""
        if not self.enabled:
            return OPEN
        found = None
        candidate = (key or "").encode()
        for known, tenant in self.keys:
            if hmac.compare_digest(candidate, known) and found is None:
                found = tenant
        return found

    def owner(self, name: str) -> str | None:
        """The tenant owning an adapter or alias, or None when it is shared."""
        return self.owners.get(name)

    def set_owner(self, name: str, tenant: str | None) -> None:
        """Give `name` to `tenant` (None: shared with every tenant)."""
        if tenant is None:
            self.owners.pop(name, None)
        else:
            self.owners[name] = tenant

    def may_use(self, tenant: str, name: str) -> bool:
        owner = self.owners.get(name)
        return tenant == OPEN or owner is None or owner == tenant


def load_tenants(path: str | Path | None) -> Tenants:
    if path is None:
        return Tenants()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise TenantsError(f"{path}: cannot read tenants file ({exc})") from None
    tenants = data.get("tenants") if isinstance(data, dict) else None
    if not isinstance(tenants, dict) or not tenants:
        raise TenantsError(f"{path}: expected 'tenants:' mapping tenant names to {{keys: [...], adapters: [...]}}")
    result = Tenants()
    seen: set[str] = set()
    for name, entry in tenants.items():
        if not isinstance(entry, dict) or not entry.get("keys"):
            raise TenantsError(f"{path}: tenants.{name}.keys: give at least one API key")
        unknown = set(entry) - {"keys", "adapters"}
        if unknown:
            raise TenantsError(f"{path}: tenants.{name}: unknown field(s) {sorted(unknown)} (valid: keys, adapters)")
        for i, key in enumerate(entry["keys"]):
            if not isinstance(key, str) or len(key) < 8:
                raise TenantsError(f"{path}: tenants.{name}.keys[{i}]: a key must be a string of 8+ characters")
            if key in seen:
                raise TenantsError(f"{path}: tenants.{name}.keys[{i}]: the same key is given to two tenants")
            seen.add(key)
            result.keys.append((key.encode(), str(name)))
        for adapter in entry.get("adapters") or []:
            if adapter in result.owners:
                raise TenantsError(f"{path}: tenants.{name}.adapters: '{adapter}' already belongs to another tenant")
            result.owners[str(adapter)] = str(name)
    return result


class ABRouter:
    def __init__(self) -> None:
        self.weights: dict[str, dict[str, float]] = {}
        self.previous: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def set_weights(self, alias: str, weights: dict[str, float]) -> None:
        if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"alias '{alias}': weights must be >= 0 and not all 0 (got {weights})")
        with self._lock:
            if alias in self.weights:
                self.previous[alias] = dict(self.weights[alias])
            self.weights[alias] = dict(weights)

    def promote(self, alias: str, variant: str) -> None:
        with self._lock:
            current = self.weights[alias]
            if variant not in current:
                raise ValueError(f"alias '{alias}' has no variant '{variant}' (variants: {sorted(current)})")
            self.previous[alias] = dict(current)
            self.weights[alias] = {v: (1.0 if v == variant else 0.0) for v in current}

    def rollback(self, alias: str) -> None:
        with self._lock:
            if alias not in self.previous:
                raise ValueError(f"alias '{alias}' has no earlier weights to roll back to")
            self.weights[alias], self.previous[alias] = self.previous[alias], self.weights[alias]

    def remove(self, alias: str) -> None:
        with self._lock:
            self.weights.pop(alias, None)
            self.previous.pop(alias, None)

    def choose(self, alias: str, user: str | None) -> str:
        with self._lock:
            weights = dict(self.weights[alias])
        u = sticky_unit(alias, user) if user else random.random()
        total = sum(weights.values())
        cumulative = 0.0
        variants = [v for v in sorted(weights) if weights[v] > 0]
        for variant in variants:
            cumulative += weights[variant] / total
            if u < cumulative:
                return variant
        return variants[-1]


def sticky_unit(alias: str, user: str) -> float:
    """A user's fixed point in [0, 1) for one alias: sha256(alias \\0 user) as a fraction."""
    digest = hashlib.sha256(f"{alias}\0{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
