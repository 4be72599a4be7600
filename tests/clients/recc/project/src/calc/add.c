#include "calc.h"
#include <banner.h>

unsigned long calc_sum(const unsigned *values, unsigned count)
{
    unsigned long total = BANNER_SEED;
    for (unsigned i = 0; i < count; i++)
        total += values[i];
    return total;
}
