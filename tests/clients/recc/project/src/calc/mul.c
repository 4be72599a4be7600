#include "calc.h"

unsigned long calc_product(const unsigned *values, unsigned count, unsigned long modulus)
{
    unsigned long product = 1;
    for (unsigned i = 0; i < count; i++)
        product = (product * values[i]) % modulus;
    return product;
}
