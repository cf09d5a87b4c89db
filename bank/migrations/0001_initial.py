"""The bank's models, moved here from `agents`: this app takes them over in the migration state only.

Their tables keep their `agents_*` names until 0002, so existing rows stay where they are.
"""

import django.db.models.deletion
from decimal import Decimal
from django.db import migrations, models


class Migration(migrations.Migration):

    initial = True

    dependencies = [
        ('agents', '0002_seed_demo_customer'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='Customer',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('user_id', models.UUIDField(help_text='The X-User-ID this customer signs in as.', unique=True)),
                        ('name', models.CharField(max_length=100)),
                        ('balance', models.DecimalField(decimal_places=2, default=Decimal('0'), max_digits=14)),
                        ('pending', models.DecimalField(decimal_places=2, default=Decimal('0'), help_text='Sum of authorised, unsettled amounts.', max_digits=14)),
                        ('currency', models.CharField(default='USD', max_length=3)),
                    ],
                    options={
                        'db_table': 'agents_customer',
                    },
                ),
                migrations.CreateModel(
                    name='Card',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('last4', models.CharField(max_length=4)),
                        ('kind', models.CharField(default='debit', max_length=20)),
                        ('status', models.CharField(choices=[('active', 'Active'), ('blocked', 'Blocked')], default='active', max_length=10)),
                        ('customer', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='cards', to='bank.customer')),
                    ],
                    options={
                        'db_table': 'agents_card',
                    },
                ),
                migrations.CreateModel(
                    name='Transaction',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('description', models.CharField(max_length=200)),
                        ('amount', models.DecimalField(decimal_places=2, help_text='Negative for money going out.', max_digits=14)),
                        ('pending', models.BooleanField(default=False)),
                        ('created_at', models.DateTimeField()),
                        ('card', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='transactions', to='bank.card')),
                        ('customer', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='transactions', to='bank.customer')),
                    ],
                    options={
                        'db_table': 'agents_transaction',
                        'ordering': ['-created_at', '-id'],
                        'indexes': [models.Index(fields=['customer', '-created_at'], name='transaction_recent')],
                    },
                ),
            ],
        ),
    ]
