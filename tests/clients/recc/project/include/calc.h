#ifndef CALC_H
#define CALC_H
unsigned long calc_sum(const unsigned *values, unsigned count);
unsigned long calc_product(const unsigned *values, unsigned count, unsigned long modulus);
#endif
