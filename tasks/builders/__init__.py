"""Back ends that turn kernel/initrd/squashfs (native) or the image itself
(auroraboot) into ISO, raw disk and iPXE artifacts."""
