"""qmprestore: restore points of qmpbackup chains as usable disk images."""
