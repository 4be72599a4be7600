#include <stdio.h>
#include <banner.h>
#include "calc.h"
#include "text.h"

int main(void)
{
    static const unsigned values[] = {3, 5, 7, 11, 13};
    char sum[64], product[64];
    text_format(sum, sizeof sum, "sum", calc_sum(values, 5));
    text_format(product, sizeof product, "product", calc_product(values, 5, 1000));
    char banner[] = BANNER;
    text_reverse(banner);
    printf("%s %s %s\n", banner, sum, product);
    return 0;
}
