"""Rebuild a request's ``MultimodalInputs`` on a scheduler rank from its descriptors.

Cost per request, whatever the feature size: for slots of a warm region, one locked read of
their table entries and zero-copy views into the mapping this process keeps
(``region_cache``); for a fallback segment, one ``open``/``flock``/``mmap``/``close`` and
views into a private copy-on-write mapping. No hash, no copy, no ``from_dict``, no
collective.

Every refusal depends only on the descriptors and the segment's bytes, so all ranks that
receive the same request refuse it the same way (see ``MultimodalTransportError``). The
one fact that can change between two ranks' looks, whether the file still exists, is
decided once by the entry rank; see Note [verdicts decided once].

Note [verdicts decided once]: a segment can be deleted from outside at any moment
(``rm /dev/shm/*``, systemd's ``RemoveIPC=yes``, a cleanup job). If rank 0 mapped it and
rank 1 then found it gone, rank 0 would serve the request and rank 1 abort it: their
batches differ and the next collective hangs. So the entry rank, in ``recv_requests``
before ``broadcast_pyobj``, checks each segment (:func:`vouch`) and writes its verdict into
the request, and every rank follows it:

- refused (missing, no valid header, not our nonce): every rank aborts with the entry
  rank's message, after dropping its reference if the segment is still there;
- vouched: every rank maps it. A rank that then can't open or map it raises
  :class:`SegmentVanishedError`, which stops the scheduler (sglang tears the server
  down) instead of aborting on that rank alone. No collective could make that rank
  agree without costing one per request, which is what this project removes.
"""

from __future__ import annotations

import copy
import errno
import mmap
import struct
from typing import Any

import numpy as np
import torch

from sglang_mmpre.errors import (
    MultimodalTransportError,
    SegmentUnreachableError,
    SegmentVanishedError,
)
from sglang_mmpre.scheduler_side.region_cache import attach, unpin
from sglang_mmpre.transport.carrier import HASHED_FIELDS, MaterializedMultimodalInputs, walk_tensors
from sglang_mmpre.transport.descriptors import (
    RegionDescriptor,
    SegmentDescriptor,
    SlotRef,
    TensorDescriptor,
    numpy_dtype,
    slot_digest,
    slot_of,
    table_digest,
    torch_dtype,
)
from sglang_mmpre.transport.liveness import OWNED_NAME_RE
from sglang_mmpre.transport.segment import HEADER_SIZE, map_segment, probe_segment

__all__ = ["vouch", "resolve"]


def _check_segment(seg: Any) -> None:
    if not isinstance(seg, SegmentDescriptor):
        raise MultimodalTransportError(f"malformed segment descriptor {type(seg).__name__}")
    if not isinstance(seg.name, str) or not OWNED_NAME_RE.match(seg.name):
        raise MultimodalTransportError(f"refused segment name {seg.name!r}: not ours")
    if not isinstance(seg.nonce, bytes) or len(seg.nonce) != 16:
        raise MultimodalTransportError("malformed segment nonce")
    if not isinstance(seg.payload_nbytes, int) or seg.payload_nbytes < 0:
        raise MultimodalTransportError("malformed segment size")


def _check_tensor(desc: TensorDescriptor, payload_nbytes: int, base: int = 0) -> None:
    try:
        expected = desc.expected_nbytes()
    except (KeyError, ValueError, TypeError) as e:
        raise MultimodalTransportError(f"malformed tensor descriptor {desc!r}: {e}") from None
    if desc.nbytes != expected:
        raise MultimodalTransportError(
            f"tensor descriptor nbytes {desc.nbytes} does not match dtype {desc.dtype} and "
            f"shape {desc.shape} ({expected} bytes)"
        )
    if (not isinstance(desc.offset, int) or desc.offset < base
            or desc.offset + desc.nbytes > base + payload_nbytes):
        raise MultimodalTransportError(
            f"tensor descriptor [{desc.offset}, +{desc.nbytes}) lies outside the segment payload "
            f"of {payload_nbytes} bytes"
        )


def _view(mapping: mmap.mmap, desc: TensorDescriptor) -> Any:
    offset = HEADER_SIZE + desc.offset
    if desc.kind == "numpy":
        dtype = numpy_dtype(desc.dtype)
        count = desc.nbytes // dtype.itemsize
        return np.frombuffer(mapping, dtype=dtype, count=count, offset=offset).reshape(desc.shape)
    dtype = torch_dtype(desc.dtype)
    if desc.nbytes == 0:
        return torch.empty(desc.shape, dtype=dtype)
    raw = torch.frombuffer(mapping, dtype=torch.uint8, count=desc.nbytes, offset=offset)
    return raw.view(dtype).view(desc.shape)


def _check_item_hashes(inputs: Any) -> None:
    """The item's ``hash``/``pad_value`` must be the ones its descriptor was written with."""
    for item in inputs.mm_items:
        item_hash = getattr(item, "hash", None)
        pad_value = getattr(item, "pad_value", None)
        if not isinstance(item_hash, int) or pad_value != item_hash % (1 << 30):
            raise MultimodalTransportError("item hash and pad_value are inconsistent")
        for name in HASHED_FIELDS:
            value = item.__dict__.get(name)
            leaves = value if isinstance(value, list) else [value]
            for leaf in leaves:
                if isinstance(leaf, TensorDescriptor) and leaf.hash != item.hash:
                    raise MultimodalTransportError(
                        "item hash does not match the hash its feature was written with"
                    )


def _copy_for_views(inputs: Any) -> Any:
    """A copy of ``inputs`` whose tensor slots can be replaced without touching ``inputs``.

    The carried object must keep its descriptors: with pipeline parallelism the scheduler
    forwards ``recv_reqs`` to the next stage (``point_to_point_pyobj``) *after* handling
    them, and that stage's ranks resolve the same descriptors again.
    """
    new = _shallow_copy(inputs)
    new.mm_items = []
    for item in inputs.mm_items:
        clone = _shallow_copy(item)
        msd = item.__dict__.get("model_specific_data")
        if isinstance(msd, dict):
            clone.__dict__["model_specific_data"] = dict(msd)
        new.mm_items.append(clone)
    return new


def vouch(m: Any, shm_dir: str) -> None:
    """Entry rank only: decide whether ``m``'s segment can be used, before the broadcast.

    Sets ``m.vouched`` (it exists, with a valid header and ``m``'s nonce) or ``m.refusal``
    (why not), overwriting whatever came over the wire; see Note [verdicts decided once].
    Touches no reference count and never raises for a bad descriptor: a malformed one is
    left unvouched, and every rank refuses it alike without opening anything.
    """
    if not isinstance(m, MaterializedMultimodalInputs):
        return
    m.vouched, m.refusal = False, None
    if m.segment is None:
        return
    if isinstance(m.segment, RegionDescriptor):
        # A region is opened once per process and kept: the entry rank attaches it now
        # (a cache hit after the first request), so a deleted region is decided here too.
        probe = lambda: attach(shm_dir, m.segment.name, m.segment.nonce)  # noqa: E731
    else:
        try:
            _check_segment(m.segment)
        except MultimodalTransportError:
            return
        probe = lambda: probe_segment(shm_dir, m.segment)  # noqa: E731
    try:
        probe()
    except MultimodalTransportError as e:
        m.refusal = str(e)
    else:
        m.vouched = True


def _vanished(shm_dir: str, e: SegmentUnreachableError) -> SegmentVanishedError:
    if e.errno != errno.ENOENT:
        return SegmentVanishedError(
            f"{e}, though the entry rank could open it: this rank is short of a resource "
            "the others had. Aborting the request on this rank alone would split the ranks' "
            "batches and hang the next collective, so this scheduler stops. Fix: raise the "
            "open-file limit (ulimit -n) or free memory on this node."
        )
    return SegmentVanishedError(
        f"{e}, though the entry rank found it intact moments ago. Something deleted files "
        f"under {shm_dir} while they were in use: systemd-logind with RemoveIPC=yes (the "
        "server's user logged out), a cleanup job or an 'rm' of the directory, or a server "
        "in another pid namespace running an sglang_mmpre that judged liveness by pid. "
        "Aborting the request on this rank alone would split the ranks' batches and hang "
        "the next collective, so this scheduler stops. Fix: set RemoveIPC=no in "
        "/etc/systemd/logind.conf or run the server as a system user, keep cleanup jobs "
        "away from sglmmpre_* files, or give this server its own SGLANG_MM_SHM_DIR."
    )


def _shallow_copy(obj: Any) -> Any:
    """``copy.copy`` for the plain dataclass instances of sglang's ``MultimodalInputs``,
    without ``copy``'s protocol probing (``MultimodalDataItem.__getattr__`` makes each
    probe raise and format an AttributeError)."""
    if not hasattr(type(obj), "__dict__") or not isinstance(getattr(obj, "__dict__", None), dict):
        return copy.copy(obj)
    new = object.__new__(type(obj))
    new.__dict__.update(obj.__dict__)
    return new


def resolve(m: Any, expected_consumers: int, shm_dir: str) -> Any:
    """Return the ``MultimodalInputs`` carried by ``m``, dropping this rank's reference.

    Raises :class:`MultimodalTransportError` for anything forged, stale or inconsistent.
    Call it once per rank and request; a second call is refused.
    """
    if not isinstance(m, MaterializedMultimodalInputs):
        raise MultimodalTransportError(
            f"materialized_mm_inputs has type {type(m).__name__}, not MaterializedMultimodalInputs"
        )
    if m.resolved:
        raise MultimodalTransportError("multimodal inputs of this request were already resolved")
    m.resolved = True
    inputs = m.inputs
    table: list[TensorDescriptor] = []

    def collect(leaf, _hash):
        if isinstance(leaf, TensorDescriptor):
            table.append(leaf)
        return leaf

    try:
        walk_tensors(inputs, collect)
    except (AttributeError, TypeError) as e:
        raise MultimodalTransportError(f"malformed multimodal inputs: {e}") from None
    seg = m.segment
    if seg is None:
        if table:
            raise MultimodalTransportError("tensor descriptors without a segment")
        return inputs
    if isinstance(seg, RegionDescriptor):
        return _resolve_slots(m, table, expected_consumers, shm_dir)
    _check_segment(seg)
    # The digest covers every descriptor; checks that would refuse the request are made
    # after map_segment has dropped our reference, so a refusal leaks nothing.
    try:
        digest = table_digest(seg, table)
    except (TypeError, ValueError, OverflowError, struct.error):
        # A field of a type or range the tokenizer never writes: a digest that matches no
        # header, so map_segment refuses it and still drops our reference.
        digest = b""
    refusal = m.refusal
    if refusal is None and seg.consumers != expected_consumers:
        refusal = (
            f"request was counted for {seg.consumers} consuming ranks but this server has "
            f"{expected_consumers}; the tokenizer and scheduler disagree on the topology"
        )
    if refusal is not None:
        # Drop our reference if the segment is still there, but give every rank the same
        # verdict: early ranks may already have unlinked it.
        try:
            map_segment(shm_dir, seg, digest)
        except MultimodalTransportError:
            pass
        raise MultimodalTransportError(refusal)
    try:
        mapping = map_segment(shm_dir, seg, digest)
    except SegmentUnreachableError as e:
        if m.vouched:
            raise _vanished(shm_dir, e) from e
        raise
    for desc in table:
        _check_tensor(desc, seg.payload_nbytes)
    _check_item_hashes(inputs)
    resolved = _copy_for_views(inputs)
    walk_tensors(resolved, lambda leaf, _h: _view(mapping, leaf) if isinstance(leaf, TensorDescriptor) else leaf)
    return resolved


# -- slots of a warm region ----------------------------------------------------------------

def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_slot_refs(desc: RegionDescriptor) -> tuple[SlotRef, ...]:
    slots = desc.slots
    if not isinstance(slots, tuple) or not slots or not all(
        isinstance(r, SlotRef) and _is_count(r.index) and _is_count(r.generation)
        and _is_count(r.offset) and _is_count(r.nbytes) for r in slots
    ) or len({r.index for r in slots}) != len(slots):
        raise MultimodalTransportError("malformed slot references")
    return slots


def _group_by_slot(refs, table: list, inputs: Any) -> tuple[dict, dict, "str | None"]:
    """Each tensor descriptor's slot, the distinct descriptors of each slot (walk order),
    and the first problem that the descriptors alone show (the same on every rank)."""
    where: dict[int, SlotRef] = {}
    groups: dict[int, list] = {r.index: [] for r in refs}
    try:
        for t in table:
            ref = slot_of(refs, t) if isinstance(t.offset, int) else None
            if ref is None:
                return where, groups, f"tensor descriptor at {t.offset!r} lies outside its slots"
            _check_tensor(t, ref.nbytes, base=ref.offset)
            where[id(t)] = ref
            if t not in groups[ref.index]:
                groups[ref.index].append(t)
        _check_item_hashes(inputs)
    except MultimodalTransportError as e:
        return where, groups, str(e)
    except Exception as e:  # a forged field whose comparison itself fails
        return where, groups, f"malformed tensor descriptor: {type(e).__name__}"
    return where, groups, None


def _digest_or_empty(ref: SlotRef, tensors: list) -> bytes:
    try:
        return slot_digest(ref, tensors)
    except (TypeError, ValueError, OverflowError, struct.error):
        return b""


def _slot_view(lease: np.ndarray, desc: TensorDescriptor, base: int) -> Any:
    start = desc.offset - base
    if desc.kind == "numpy":
        dtype = numpy_dtype(desc.dtype)
        return lease[start:start + desc.nbytes].view(np.ndarray).view(dtype).reshape(desc.shape)
    dtype = torch_dtype(desc.dtype)
    if desc.nbytes == 0:
        return torch.empty(desc.shape, dtype=dtype)
    raw = torch.frombuffer(lease, dtype=torch.uint8, count=desc.nbytes, offset=start)
    return raw.view(dtype).view(desc.shape)


def _resolve_slots(m: MaterializedMultimodalInputs, table: list,
                   expected_consumers: int, shm_dir: str) -> Any:
    """Views into the slots of a warm region; this rank's references stay held by the
    views' lease (see Note [slot isolation] in ``region_cache``).

    Refusals that the descriptors alone decide come first (topology, bounds, hashes), then
    the slot table's (stale generation or no references left, then a table digest that
    differs); a reference that is ours (generation matches, references left) is dropped
    on every refusal, so a refused request leaks nothing.
    """
    inputs, desc = m.inputs, m.segment
    refs = _check_slot_refs(desc)
    try:
        region = attach(shm_dir, desc.name, desc.nonce, pin=True)
    except SegmentUnreachableError as e:
        if m.vouched:
            raise _vanished(shm_dir, e) from e
        raise MultimodalTransportError(m.refusal or str(e)) from None
    try:  # pinned: the releaser thread can't forget it before its slots are leased
        leases, where = _check_and_lease(m, region, refs, table, expected_consumers)
    finally:
        unpin(region)
    resolved = _copy_for_views(inputs)

    def view(leaf, _hash):
        if not isinstance(leaf, TensorDescriptor):
            return leaf
        ref = where[id(leaf)]
        return _slot_view(leases[ref.index], leaf, ref.offset)

    walk_tensors(resolved, view)
    return resolved


def _check_and_lease(m: MaterializedMultimodalInputs, region: Any, refs: tuple,
                     table: list, expected_consumers: int) -> tuple[dict, dict]:
    """Refuse ``m``'s slot references or lease them (see :func:`_resolve_slots`); returns
    the leases and each descriptor's slot reference."""
    inputs, desc = m.inputs, m.segment
    if any(r.index >= region.slot_count for r in refs):
        raise MultimodalTransportError(f"slot index out of range for region {desc.name}")
    problem = m.refusal
    if problem is None and desc.consumers != expected_consumers:
        problem = (
            f"request was counted for {desc.consumers} consuming ranks but this server has "
            f"{expected_consumers}; the tokenizer and scheduler disagree on the topology"
        )
    where, groups, found = _group_by_slot(refs, table, inputs)
    problem = problem or found
    digests = {r.index: _digest_or_empty(r, groups[r.index]) for r in refs}
    with region.table.locked():
        entries = [region.table.read(r.index) for r in refs]
        ours = [r for r, e in zip(refs, entries) if e.generation == r.generation and e.refcount > 0]
        if problem is None and len(ours) < len(refs):
            problem = (
                f"stale slot reference into region {desc.name}: the slot was released or "
                "reused since this request was sent"
            )
        if problem is None and not all(
            (e.offset, e.nbytes) == (r.offset, r.nbytes) and e.digest == digests[r.index]
            and region.slot_in_bounds(r) for r, e in zip(refs, entries)
        ):
            problem = (
                f"descriptors do not match the slot table of region {desc.name} "
                "(wrong slot, dtype, shape, nbytes, offset or hash)"
            )
        if problem is not None:
            for r in ours:
                region.table.add(r.index, -1)
    if problem is not None:
        raise MultimodalTransportError(problem)
    return region.lease(refs), where
