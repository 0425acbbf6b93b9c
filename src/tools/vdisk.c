/* vdisk.c - placeholder main until the tool lands. */
#include <stdio.h>
int main(void)
{
    fprintf(stderr, "vdisk: not built yet\n");
    return 1;
}
