from longmem.errors import LongMemError
