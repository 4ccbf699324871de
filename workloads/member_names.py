"""What a pack member's name says: its path components, whether it is unsafe, junk an OS left
behind, or not an image at all.

Member names are never used as file paths (a member is copied to one fixed temp file and
stored under its sha256), but a name an extractor could not use safely marks a hostile or
broken pack, so it is refused with a reason its author can act on.
"""

from __future__ import annotations

import posixpath

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
ARCHIVE_EXTS = {".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar", ".zst"}
JUNK_NAMES = {"thumbs.db", ".ds_store", "desktop.ini"}
JUNK_DIRS = {
    "__MACOSX",
    "@eaDir",
    ".Trashes",
    ".Spotlight-V100",
    ".fseventsd",
}  # macOS, Synology NAS thumbnails


def name_parts(name: str) -> list[str]:
    """Path components; a backslash counts as a separator (the zip spec says '/', some
    Windows tools write '\\'), and '.' and empty components are dropped."""
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def unsafe_reason(name: str) -> str | None:
    if name.startswith(("/", "\\")):
        return "unsafe path: absolute member path"
    if len(name) > 1 and name[1] == ":" and name[0].isalpha():
        return "unsafe path: Windows drive path"
    parts, depth = name_parts(name), 0
    for part in parts:
        depth += -1 if part == ".." else 1
        if depth < 0:
            return "unsafe path: escapes the pack root (..)"
    if ".." in parts:  # a/../b stays inside, but no honest tool writes it
        return "unsafe path: '..' in member path"
    return None


def is_junk(name: str) -> bool:
    parts = name_parts(name)
    base = parts[-1] if parts else ""
    return (
        any(p in JUNK_DIRS for p in parts[:-1])
        or base.startswith("._")
        or base.lower() in JUNK_NAMES
    )


def kind_reason(name: str) -> str | None:
    """Nested archives and non-images, by extension (content is checked later)."""
    base = (name_parts(name) or [""])[-1].lower()
    ext = posixpath.splitext(base)[1]
    if ext in ARCHIVE_EXTS:
        full = ".tar" + ext if base[: -len(ext)].endswith(".tar") else ext
        return f"nested archive ({full}): not unpacked"
    if ext not in IMAGE_EXTS:
        return f"not an image: extension {ext or '(none)'}"
    return None
