"""The inode tree: one directory per volume (or the root itself in standalone mode), files below.

Inode numbers are handed out once and never reused, so a number the kernel holds always means the
same file or nothing at all. That holds across daemon generations too: the kernel keeps node ids
when a new daemon takes the connection over, so a volume is rebuilt with the inode numbers it had
(``add_volume(inodes=...)``, the map it returned when it was first added) and new numbers start
above every number ever handed out on the connection (``reserve``). Pure data, no I/O: the FUSE
layer and tests use it directly.
"""

from __future__ import annotations

import functools
import stat
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from providers.base import FileSpec

ROOT_INODE = 1
DIR_MODE = 0o555


# The pods of one class have the same file names and modes: one object each for all of their
# nodes, not one per node (~0.7 KiB per volume of 10 files). Bounded: recent names, and at most
# 2**16 modes.
@functools.lru_cache(maxsize=4096)
def _name(text: str) -> bytes:
    return text.encode()


@functools.cache
def _mode(mode: int) -> int:
    return mode


@dataclass(slots=True)
class Node:
    inode: int
    parent: int
    name: bytes
    mode: int  # full st_mode, type bits included
    uid: int
    gid: int
    volume: str | None
    children: dict[bytes, int] | None = None  # directories only, name -> inode
    spec: FileSpec | None = None  # files only
    key: Hashable | None = None  # files only: the cache key of the file's source
    mtime_ns: int = 0

    @property
    def is_dir(self) -> bool:
        return self.children is not None


@dataclass
class Tree:
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    nodes: dict[int, Node] = field(default_factory=dict)
    by_key: dict[Hashable, set[int]] = field(default_factory=dict)
    # One object per distinct cache key in use (``canonical``): volumes of one identity and class
    # share their keys' tuples instead of holding equal copies (measured: ~1.4 KiB a volume).
    _canon: dict[Hashable, Hashable] = field(default_factory=dict)
    _next: int = ROOT_INODE + 1

    def __post_init__(self) -> None:
        self.nodes[ROOT_INODE] = Node(
            ROOT_INODE,
            ROOT_INODE,
            b"",
            stat.S_IFDIR | DIR_MODE,
            self.uid,
            self.gid,
            None,
            children={},
            mtime_ns=self.mtime_ns,
        )

    def __getitem__(self, inode: int) -> Node:
        return self.nodes[inode]

    def get(self, inode: int) -> Node | None:
        return self.nodes.get(inode)

    def lookup(self, parent: int, name: bytes) -> Node | None:
        node = self.nodes.get(parent)
        if node is None or node.children is None:
            return None
        if name == b".":
            return node
        if name == b"..":
            return self.nodes.get(node.parent)
        child = node.children.get(name)
        return None if child is None else self.nodes.get(child)

    def children(self, inode: int) -> list[Node]:
        """Children sorted by name, so readdir offsets are stable."""
        node = self.nodes[inode]
        assert node.children is not None
        return [self.nodes[i] for _, i in sorted(node.children.items())]

    def canonical(self, key: Hashable) -> Hashable:
        """The object of an equal key already in use, else ``key`` itself."""
        return self._canon.get(key, key)

    def _index(self, key: Hashable, ino: int) -> None:
        inodes = self.by_key.get(key)
        if inodes is None:
            inodes = self.by_key[key] = set()
            self._canon[key] = key
        inodes.add(ino)

    def _unindex(self, key: Hashable, ino: int) -> None:
        inodes = self.by_key.get(key)
        if inodes is not None:
            inodes.discard(ino)
            if not inodes:
                del self.by_key[key]
                self._canon.pop(key, None)

    def inodes_for(self, key: Hashable) -> set[int]:
        return self.by_key.get(key, set())

    def rekey(self, keys: Mapping[int, Hashable]) -> None:
        """Give files other cache keys (inode -> new key): a volume served under another
        identity. Same nodes, same numbers; only what ``inodes_for`` answers changes."""
        for ino, key in keys.items():
            node = self.nodes[ino]
            assert node.spec is not None, "only files have keys"
            self._unindex(node.key, ino)
            node.key = self.canonical(key)
            self._index(node.key, ino)

    def add_volume(
        self,
        volume: str,
        files: Sequence[tuple[FileSpec, Hashable]],
        *,
        uid: int,
        gid: int,
        mtime_ns: int,
        at_root: bool = False,
        inodes: Mapping[str, int] | None = None,
    ) -> dict[str, int]:
        """Add a volume's files; returns the inode of each path created ("" is the volume's
        directory). A path in ``inodes`` gets that number again if it is free."""
        wanted = inodes or {}
        made: dict[str, int] = {}
        if at_root:
            top = ROOT_INODE
            root = self.nodes[ROOT_INODE]
            root.uid, root.gid, root.volume = uid, gid, volume
        else:
            name = volume.encode()
            if self.lookup(ROOT_INODE, name) is not None:
                raise ValueError(f"volume {volume!r} exists")
            top = self._mkdir(ROOT_INODE, name, volume, uid, gid, mtime_ns, wanted.get(""))
            made[""] = top
        for spec, key in files:
            *dirs, base = spec.path.split("/")
            parent = top
            for i, d in enumerate(dirs):
                existing = self.lookup(parent, d.encode())
                if existing is None:
                    path = "/".join(dirs[: i + 1])
                    parent = self._mkdir(
                        parent, d.encode(), volume, uid, gid, mtime_ns, wanted.get(path)
                    )
                    made[path] = parent
                elif existing.is_dir:
                    parent = existing.inode
                else:
                    raise ValueError(f"{spec.path!r}: {d!r} is a file")
            name = _name(base)
            if self.lookup(parent, name) is not None:
                raise ValueError(f"duplicate file {spec.path!r}")
            ino = made[spec.path] = self._new(parent, name, wanted.get(spec.path))
            key = self.canonical(key)
            self.nodes[ino] = Node(
                ino,
                parent,
                name,
                _mode(stat.S_IFREG | spec.mode),
                uid,
                gid,
                volume,
                spec=spec,
                key=key,
                mtime_ns=mtime_ns,
            )
            self._index(key, ino)
        return made

    def reserve(self, next_inode: int) -> None:
        """Never hand out a number below ``next_inode`` (numbers an earlier generation used)."""
        self._next = max(self._next, next_inode)

    @property
    def next_inode(self) -> int:
        return self._next

    def remove_volume(self, volume: str) -> list[int]:
        """Remove a volume's nodes; returns the removed inodes (the root is never removed)."""
        removed = [ino for ino, n in self.nodes.items() if n.volume == volume and ino != ROOT_INODE]
        for ino in removed:
            node = self.nodes.pop(ino)
            if node.key is not None:
                self._unindex(node.key, ino)
            parent = self.nodes.get(node.parent)
            if parent is not None and parent.children is not None:
                parent.children.pop(node.name, None)
        root = self.nodes[ROOT_INODE]
        if root.volume == volume:
            root.volume = None
        return removed

    def path(self, inode: int) -> str:
        """The path of ``inode`` relative to the root ("" for the root or an unknown inode)."""
        names = []
        node = self.nodes.get(inode)
        while node is not None and node.inode != ROOT_INODE:
            names.append(node.name.decode("utf-8", "surrogateescape"))
            node = self.nodes.get(node.parent)
        return "/".join(reversed(names)) if node is not None else ""

    def walk(self, inode: int = ROOT_INODE) -> Iterator[Node]:
        node = self.nodes[inode]
        yield node
        if node.children is not None:
            for child in self.children(inode):
                yield from self.walk(child.inode)

    def _new(self, parent: int, name: bytes, wanted: int | None = None) -> int:
        if wanted is not None and ROOT_INODE < wanted < self._next and wanted not in self.nodes:
            ino = wanted
        else:
            ino = self._next
            self._next += 1
        p = self.nodes[parent]
        assert p.children is not None
        p.children[name] = ino
        return ino

    def _mkdir(
        self,
        parent: int,
        name: bytes,
        volume: str,
        uid: int,
        gid: int,
        mtime_ns: int,
        wanted: int | None = None,
    ) -> int:
        ino = self._new(parent, name, wanted)
        self.nodes[ino] = Node(
            ino,
            parent,
            name,
            stat.S_IFDIR | DIR_MODE,
            uid,
            gid,
            volume,
            children={},
            mtime_ns=mtime_ns,
        )
        return ino
