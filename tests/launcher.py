"""Start the project's scripts as a user runs them, without paying for `import torch` each time.

Every script imports torch first, and on a 2-core CPU that is 1.3 s of the 2 s a script takes to
refuse a bad input; the suite starts a script about a hundred times. This process imports torch once
(and nothing else), then runs each script in a child forked from it: the child takes the request's
folder, environment, arguments and output files, runs the script as `__main__`, imports everything
else itself, and ends as any Python process ends (an uncaught exception prints its traceback and
exits 1, `sys.exit` gives its status). One difference from a fresh process: what torch's libraries
read from the environment when they load (OMP_NUM_THREADS) comes from the launcher's start, so a
test that needs another value starts its script with subprocess itself.

Requests come one per line on stdin, as JSON {script, args, cwd, env, stdout, stderr}; the reply is
the child's exit status on a line of its own (negative for a signal, as in subprocess).
"""

import json
import os
import runpy
import sys

import torch  # noqa: F401  (the import the scripts share, paid once here)

for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags)
            os.dup2(opened, fd)
            os.close(opened)
        sys.argv = [request["script"], *request["args"]]
        sys.path[0] = os.path.dirname(request["script"])
        runpy.run_path(request["script"], run_name="__main__")
        break  # the child is done: leave the loop, and Python's own exit flushes and ends it
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
