"""Session set-up shared by every test module."""

import signal

# The signal tests expect Python's default SIGINT handler, in this process and in the processes it
# starts. A shell that runs a command in the background without job control (`cmd &` in a
# script, `nohup`) starts it with SIGINT ignored, and an ignored disposition is inherited by every
# child: restore the default so the suite means the same however it was launched.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
