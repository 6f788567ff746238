"""`gradsync run`: a user's script on several processes, with torchrun's flags and variables.

    config.py  the flags (torchrun's names, then --elastic and --lab), validated
    launch.py  starting and supervising the ranks: here, on several nodes, in a lab, elastic
    logs.py    --log-dir / --redirects / --tee: each rank's output to its files
    cli.py     the `run` sub-command's parser (the script and its arguments after the flags)

No torch import, except for --elastic (its store lives in the launcher).
"""
