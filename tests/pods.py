"""Run a process as a pipeline pod's would run: as the images' user and group (components.platform.IMAGE_UID),
with the groups the pod has (the fill Job: its fsGroup; pipeline pods: none) and a container's umask.

`setpriv` (util-linux) switches the user. The one privilege kept is CAP_DAC_READ_SEARCH (ambient): this
machine's interpreter lives under root's 0700 home, which the user could not otherwise reach; it lets the
process read and traverse any folder but not write: every write still needs the permissions a pod would
need, which is what these tests check (EACCES on the model cache, the work folder, the results folder)."""

from __future__ import annotations

import os
import shutil

from components.platform import IMAGE_UID


def as_image_user(cmd: list[str], groups: tuple[int, ...] = ()) -> list[str]:
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    group_arg = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    return [setpriv, f"--reuid={IMAGE_UID}", f"--regid={IMAGE_UID}", group_arg, "--inh-caps=+dac_read_search",
            "--ambient-caps=+dac_read_search", "--", *cmd]


def can_switch_user() -> bool:
    return os.geteuid() == 0 and bool(shutil.which("setpriv"))
