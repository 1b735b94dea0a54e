"""The fork server's preload: workers die with the service and ignore the group's signals.

Imported only by the multiprocessing fork server (its preload list): the fork server dies
with the service that started it, so the kernel then kills its workers too (they ask for
``PR_SET_PDEATHSIG`` themselves, see :mod:`huntsman.workers.lifeline`)."""

import signal

from huntsman.workers.lifeline import die_with_parent

die_with_parent()
# The group's SIGTERM/SIGHUP (supervisord's stopasgroup, a terminal hang-up) are the service's.
for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, signal.SIG_IGN)
