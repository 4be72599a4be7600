#ifndef TEXT_H
#define TEXT_H
#include <stddef.h>
size_t text_format(char *out, size_t size, const char *label, unsigned long value);
void text_reverse(char *s);
#endif
