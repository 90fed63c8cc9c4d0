"""PXE boot path: boot configs (pxelinux.cfg, iPXE scripts) and boot-file serving."""
