#include <stdio.h>
#include "text.h"

size_t text_format(char *out, size_t size, const char *label, unsigned long value)
{
    int n = snprintf(out, size, "%s=%lu", label, value);
    return n < 0 ? 0 : (size_t)n;
}
