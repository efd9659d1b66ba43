"""The overlayfs upper-layer format shared by every engine, diff and commit (DESIGN §3)."""
