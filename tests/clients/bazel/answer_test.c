#include <stdio.h>

int answer(void);

int main(void) {
    if (answer() != 42) {
        fprintf(stderr, "answer() = %d, want 42\n", answer());
        return 1;
    }
    printf("ok\n");
    return 0;
}
