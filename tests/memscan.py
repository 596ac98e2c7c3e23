"""A program fragment for the sandbox tests: which byte patterns are anywhere in the readable
memory of the process that runs it (its own /proc/self/mem). A pattern is written so that it
does not match its own text (rb'SECRE[T]'), or it would always find itself."""

SCAN = '''
def memory_has(patterns):
    import re
    found = [False] * len(patterns)
    mem = open('/proc/self/mem', 'rb', 0)
    for line in open('/proc/self/maps'):
        span, perms = line.split()[:2]
        lo, hi = (int(x, 16) for x in span.split('-'))
        if perms[0] != 'r' or hi - lo > 1 << 28:
            continue
        try:
            mem.seek(lo)
            chunk = mem.read(hi - lo)
        except OSError:
            continue
        found = [f or bool(re.search(p, chunk)) for f, p in zip(found, patterns)]
    return found
'''
